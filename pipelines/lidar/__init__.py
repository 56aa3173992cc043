"""LiDAR scans and scenes: segment a scan (``segment.py``), train (``train.py``), the
bird's-eye report (``report.py``) and the demo (``demo.py``)."""
