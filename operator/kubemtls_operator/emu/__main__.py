import sys

from kubemtls_operator.emu.server import main

sys.exit(main())
