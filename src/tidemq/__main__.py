"""``python -m tidemq`` is ``tide``: how ``tide up`` starts the services."""

from tidemq.cli.main import main

if __name__ == "__main__":
    main()
