import sys

from jaxsgl.bench_serving.cli import main

sys.exit(main())
