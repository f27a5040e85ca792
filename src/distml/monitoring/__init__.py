"""Monitoring: tracking backends and scalability analysis."""
