"""BrainLine: DICOM/PACS-integrated brain MRI processing for neuro-oncology.

The code lives in three top-level folders mapped into this package:
``service/`` -> ``brainline.service``, ``pipelines/`` -> ``brainline.pipelines``,
``models/`` -> ``brainline.models``; ``config/`` -> ``brainline.config`` holds
the default YAML files.
"""

__version__ = "0.1.0"
