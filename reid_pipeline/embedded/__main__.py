"""``python -m reid_pipeline.embedded``: build the embedded default (see :mod:`.build`)."""

if __name__ == "__main__":  # the generator's spawned workers import this module again: they must not build
    from reid_pipeline.embedded.build import main

    main()
