"""Writing the relevance pass as ONNX ops: the op registry with each op's facts
(:mod:`.registry`), the emitting API (:mod:`.builder`), one module per op family under
:mod:`.ops`, the generic linear-rule engine (:mod:`.linear`), denominators and stabilizers
(:mod:`.denominators`), where relevance provably vanishes (:mod:`.relevance_support`), the
reverse walk (:mod:`.compiler`) and the compiled model's contract (:mod:`.contract`)."""
