import sys
from docs.build import main

sys.exit(main())
