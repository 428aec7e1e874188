"""Classification heads: the Head IR every adapter produces, zero-shot head building from class names and
templates, and adding a head to an existing bundle.
"""
