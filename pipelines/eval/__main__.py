import sys

from pipelines.eval.evaluate import main

sys.exit(main())
