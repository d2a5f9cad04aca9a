"""dspark_plugins: the SpecVerify op (reference, ONNX function, Triton kernel, TensorRT plugin)."""
