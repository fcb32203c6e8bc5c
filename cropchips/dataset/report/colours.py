"""The report's fixed colours: one per mask label, per cell status and per split."""

#: One fixed colour per mask label, used by the bar chart, the split bars, the legends and the overlays.
PALETTE: dict[int, str] = {
    0: "#dcdcdc",  # no field (never drawn over the quicklooks)
    1: "#808000",  # olive plantations
    2: "#8e24aa",  # vineyards
    3: "#e53935",  # fruit
    4: "#1b5e20",  # nuts, orchards, forest
    5: "#fdd835",  # cereals
    6: "#26c6da",  # legumes
    7: "#3949ab",  # vegetables
    8: "#fb8c00",  # fallow, bare arable land
    255: "#9e9e9e",  # ignore: a field of none of the classes or of unknown crop, pixels without image data
}
#: The colour of a label :data:`PALETTE` lacks (a custom unmapped label 9..254).
OTHER_LABEL_COLOUR = "#424242"
STATUS_COLOURS: dict[str, str] = {"ok": "#2e7d32", "no_scenes": "#607d8b", "no_fields": "#f9a825",
                                  "failed": "#c62828"}
OTHER_STATUS_COLOUR = "#bdbdbd"
SPLIT_COLOURS: dict[str, str] = {"train": "#1565c0", "val": "#ef6c00", "test": "#6a1b9a"}
OTHER_SPLIT_COLOUR = "#616161"
