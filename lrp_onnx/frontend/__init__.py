"""Reading a model and seeing it as layers: loading and validation (:mod:`.load`), the passes
that make exporter spellings uniform (:mod:`.passes`), the graph view (:mod:`.graph`), the layer
view (:mod:`.layers`) and the nested structure of the layers (:mod:`.structure`)."""
