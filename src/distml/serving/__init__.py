"""Serving: the Open Inference Protocol over HTTP (``distml serve``) and batch inference
(``distml predict``)."""
