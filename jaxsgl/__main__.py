import sys

from jaxsgl.cli import main

sys.exit(main())
