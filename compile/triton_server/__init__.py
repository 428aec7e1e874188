"""clipfold export triton: a Triton Inference Server model repository from a bundle, and the
Python-backend models it copies in.
"""
