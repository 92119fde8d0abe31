"""The device layer: what runs a model on the target, under ``apply`` (pruning and simulated formats), ``latency``
(tables and the predictor) and ``export``.

- :mod:`hwprune.device.targets`: the targets (cpu, cuda, arm) and their runtimes, threads, fingerprint (the one
  definition of the same device is :func:`hwprune.latency.table.fingerprint_diff` over it), ``realize``, ``prepare``
  and the target session that restores process-wide settings.
- :mod:`hwprune.device.timing`: the samplers that time on each device.
- :mod:`hwprune.device.kernels`: real low-precision kernels and precision-region planning.
- :mod:`hwprune.device.deploy`: a model with simulated formats put on the target's real kernels.
- :mod:`hwprune.device.onnxrt`: ONNX export, ONNX Runtime / OpenVINO sessions (the cpu target's ``onnxruntime`` and
  ``openvino`` runtimes and export's ``model.onnx``).
"""
