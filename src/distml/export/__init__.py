"""Exports of a pipeline for other systems: ``distml export kubernetes`` writes a Dockerfile
and Kubeflow Trainer, KServe and Argo manifests (``writer.export_kubernetes``)."""
