"""Fused similarity + top-k: the numpy reference, the C kernel's launcher (AVX-512 / AVX2 chosen at run
time), the gallery storage, and the Triton GPU kernel (imported lazily).
"""
