"""What the volume side (:mod:`medvit`) and the scene side (:mod:`pointcloud`) share.

``errors`` (the user-error types), ``files`` (atomic writing, input protection), ``config``
(the strict pydantic base, the YAML reader, the training section), ``registry`` (one
``Registry`` class for nets built by name, options checked against the constructor),
``weights`` (safetensors weights with a JSON sidecar) and ``values`` (argument helpers).

At module level these import only the standard library, numpy, pydantic, yaml and
safetensors, so that neither torch nor MONAI loads with them; a function that handles torch
tensors imports torch when called.
"""
