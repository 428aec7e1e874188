"""Reduced-precision variants: configs, fp16 / bf16, the int8 / int4 / fp8 quantizers and their
sensitivity search, the accuracy gate and its image sets, the native fp32 variant, the if-faster check.

In the order compile uses them:
  config.py          the options (QuantConfig, GateConfig) and the table of precisions (PRECISIONS)
  variants.py        the loop: each precision built, gated against fp32, searched if it misses
  quantize.py        int8 / int4 / fp8 graph builders and the nodes' sensitivity ranking
  float16.py         the fp16 graph conversion and its repairs
  bf16.py            the bf16 variant (the fp32 graph run by OpenVINO in bfloat16; nothing built)
  native_variant.py  building the fp32-native variant (ViT weights packed for the C kernel); the
                     runtime's backends/native.py runs it
  image_sets.py      the calibration, search and gate images, never overlapping
  gate.py            the gate's figures against fp32 and its verdict
  speed_check.py     compile --if-faster: keep a CPU alternative only where it is faster
"""
