"""Generate images with a distilled student (or its teacher); docs/generate.md.

apex-generate "a red cube on a table" --source runs/qwen_lora --nfe 1 --out images/
apex-generate --prompt-file prompts.txt --source exports/merged --base /models/Qwen-Image
apex-generate "a cat" --source runs/qwen_lora --compare        # student vs teacher timing
"""

from __future__ import annotations

import sys

from apex_dist.generate import main

if __name__ == "__main__":
    sys.exit(main())
