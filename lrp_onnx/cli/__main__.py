"""``python -m lrp_onnx.cli``: the ``lrp-onnx`` command."""

import sys

from lrp_onnx.cli.main import main

sys.exit(main())
