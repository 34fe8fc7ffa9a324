"""Convert Suno's original Bark release into a bark-hf model folder.

    python conversion/convert_suno_checkpoint.py --checkpoint-dir DIR --codec PATH \
        --tokenizer DIR [--voice-presets DIR] --output-dir OUT [--overwrite]

Same as `bark-hf convert`; the logic lives in `bark_hf.conversion` so that the installed
command and this script share it (see docs/conversion.md).
"""

import sys

from bark_hf.conversion.convert_suno import main

if __name__ == "__main__":
    sys.exit(main())
