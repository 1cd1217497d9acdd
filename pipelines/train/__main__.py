import sys

from pipelines.train.trainer import main

sys.exit(main())
