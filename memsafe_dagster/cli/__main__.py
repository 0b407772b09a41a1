import sys

from memsafe_dagster.cli import main

sys.exit(main())
