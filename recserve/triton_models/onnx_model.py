"""An ONNX model run by ONNX Runtime inside a python-backend model (the embedded flavor).

The pip-installed tritonserver has no onnxruntime backend; this runs the very same model.onnx that
the native flavor hands to Triton's onnxruntime backend. Triton's [B, 1] scalars are squeezed to the
model's [B] inputs, as `reshape: { shape: [] }` does in the native flavor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recserve.triton_models.base import BatchedModel


class TritonPythonModel(BatchedModel):
    def load(self, version_dir: Path, params: dict[str, str]) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        opts.inter_op_num_threads = 1
        # several python-backend processes share the cores: idle threads must sleep, not spin
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(version_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        self.INPUTS = tuple(i.name for i in self.session.get_inputs())
        self.OUTPUTS = tuple(o.name for o in self.session.get_outputs())
        self.ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}

    def compute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {n: (v.reshape(v.shape[:-1]) if v.ndim == self.ranks[n] + 1 and v.shape[-1] == 1 else v)
                for n, v in inputs.items()}
        return dict(zip(self.OUTPUTS, self.session.run(list(self.OUTPUTS), feed)))
