"""Monitoring: tracking backends, scalability analysis, and data and concept drift."""
