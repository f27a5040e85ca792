"""Data and concept drift: column tests, streaming detectors, the monitor that feeds them,
the reference it compares against, and their plots. Below serving (which feeds it served
traffic) and above data: it imports neither serving nor training nor workflow."""
