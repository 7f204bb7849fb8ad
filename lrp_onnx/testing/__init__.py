"""The test harness, outside the compiler: numpy references in matrix form (:mod:`.references`),
the torch/Zennit oracle (:mod:`.oracle`) and torchvision zoo (:mod:`.zoo`), the LXT oracle for
torchvision ViTs (:mod:`.transformers`) and for BERT, GPT-2 and Llama (:mod:`.text_models`), the
fuzzers (:mod:`.fuzzing`) and the float64 runner (:mod:`.float64`).

``import lrp_onnx`` never imports this package; :mod:`.oracle`, :mod:`.zoo`,
:mod:`.transformers` and :mod:`.text_models` need the test dependencies
(``pip install ".[test]"``: torch, torchvision, zennit, lxt 2.1 with transformers 4.52.4).
"""
