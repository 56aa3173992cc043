"""Volumes: segment a case (``segment.py``), train (``train.py``), pretrain an encoder
(``pretrain.py``), score (``evaluate.py``), report (``report.py``), cohorts on Ray
(``batch.py``, ``cohort.py``) and the demo (``demo.py``)."""
