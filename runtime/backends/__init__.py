"""What runs a bundle's graph: the Backend protocol, the lazy name -> module registry, and one module per
engine (ONNX Runtime, OpenVINO, TensorRT, the native ViT kernel, the kernel top-k head).
"""
