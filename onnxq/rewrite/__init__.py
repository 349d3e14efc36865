"""The rewrite stage: the quantization plan, its numbers (``quant_math``), QDQ, QOperator and fp16 forms, and building one model."""
