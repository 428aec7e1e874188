"""Reduced-precision variants: configs, fp16 / bf16, the int8 / int4 / fp8 quantizers and their
sensitivity search, the accuracy gate and its image sets, the native fp32 variant, the if-faster check.
"""
