"""Export stage: ONNX models, INT8 (QDQ), FAISS index, Triton model repository."""
