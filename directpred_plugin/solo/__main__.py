"""``python -m directpred_plugin.solo SCRIPT.py [ARGS...]``: see `directpred_plugin.solo.launcher`."""

if __name__ == "__main__":  # not when multiprocessing re-imports it as __mp_main__
    from directpred_plugin.solo.launcher import main

    raise SystemExit(main())
