"""``python -m reid_pipeline.embedded``: build the embedded default (see :mod:`.build`)."""

from reid_pipeline.embedded.build import main

main()
