from vlm.cli import main
import sys
sys.exit(main())
