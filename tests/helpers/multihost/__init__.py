"""Network namespaces as machines, and the engines and jobs the multi-host tests start on
them (tests/multihost/)."""
