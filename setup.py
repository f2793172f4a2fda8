from setuptools import setup

# Metadata lives in setup.cfg; data files are listed here because they install outside the package.
setup(
    data_files=[
        ("share/vmimagemanager", ["libvirt.xsl", "vmimagemanager.cfg.template"]),
        ("share/doc/vmimagemanager", ["README", "ChangeLog"]),
        ("share/man/man1", ["docs/vmimagemanager.1"]),
    ],
)
