"""The compile stages in the order data flows: load the model (checkpoint, tokenizer), adapt, fold,
export, verify; the text tower's export. compile/pipeline.py chains them.
"""
