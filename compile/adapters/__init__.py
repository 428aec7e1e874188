"""Few-shot adapters: each fits or imports a method and returns a :class:`~clipfold.compile.heads.ir.Head`."""
