"""The device layer: what runs a model on the target, beside eager PyTorch.

:mod:`hwprune.device.onnxrt` exports a module to ONNX (the torch.export-based exporter) and runs it in ONNX Runtime
or OpenVINO on the CPU; :class:`hwprune.latency.targets.CpuTarget` uses it for its ``onnxruntime`` and ``openvino``
runtimes, and ``hwprune export`` for the ``model.onnx`` artifact.
"""
