"""The SpecVerify op (lossless speculative verification); see spec.md in this folder.

`reference` (NumPy) and `onnx_function` import with the base install; `triton_kernel`,
`torch_composite` and `tensorrt_plugin` need torch, triton or tensorrt and are imported on use.
"""
from .onnx_function import DOMAIN, OP_TYPE, make_function, make_verify_model, strip_function
from .reference import inverse_cdf_sample, spec_verify

__all__ = ["DOMAIN", "OP_TYPE", "inverse_cdf_sample", "make_function", "make_verify_model",
           "spec_verify", "strip_function"]
