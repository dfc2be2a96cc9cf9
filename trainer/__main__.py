from trainer.cli import main

if __name__ == "__main__":  # not when a forked worker loads the main module as __mp_main__
    raise SystemExit(main())
