"""What to propagate: LRP rules as data (:mod:`.core`), composites and presets that assign them
to layers (:mod:`.composites`), and JSON rule files (:mod:`.rulefile`)."""
