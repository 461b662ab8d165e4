"""Multi-node DeepSpeed training from a YAML config (``hpcdl train``, ``hpcdl.Run``).

A run is :class:`hpcdl.train.run.Run`; the loop is :mod:`hpcdl.train.trainer`. This package
module itself stays empty: importing any part of it (a job unpickling
:func:`hpcdl.train.run.run_job`) must not import torch or DeepSpeed.
"""
