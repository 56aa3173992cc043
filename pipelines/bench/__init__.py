"""Benchmarks behind ``medvit bench``: each measures us against the peer in the same run
(``engine.py``: the volume engine; ``lidar.py``: scenes; ``models.py``: every volume net)."""
