"""The "emparticles" dock widget: analyse the open image, review the particles in a table linked
to the labels, follow the size distribution, correct (delete, merge, split, paint) and save."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..corrections import (
    delete_particles,
    merge_particles,
    new_particle_id,
    save_corrected_labels,
    split_particle,
)

#: Table columns: (title, column of the particle table in px, the same in nm or None)
COLUMNS = [("label", "label", None), ("area", "area_px", "area_nm2"), ("ECD", "ecd_px", "ecd_nm"),
           ("Feret max", "feret_max_px", "feret_max_nm"), ("Feret min", "feret_min_px", "feret_min_nm"),
           ("circularity", "circularity", None), ("in statistics", "in_statistics", None)]


def particle_table(labels: np.ndarray, pixel_size_nm: float | None, infobar_rows: int = 0,
                   edge_mode: str = "exclude") -> pd.DataFrame:
    """The particles of a (possibly edited) full-size label image, measured as ``analyze`` does
    (info bar rows left out), with ``in_statistics`` (not cut by the field's border, unless the
    run keeps edge particles)."""
    from ..measure import measure_labels
    from ..stats.edges import edge_weights

    field = np.asarray(labels)[: labels.shape[0] - infobar_rows]
    table = measure_labels(field.astype(np.int32), None, pixel_size_nm)
    table["in_statistics"] = edge_weights(table, field.shape[1], field.shape[0], edge_mode) > 0 if len(table) else []
    return table


def size_summary(table: pd.DataFrame, pixel_size_nm: float | None) -> dict:
    """Count and D10/D50/D90 of the ECD of the particles in the statistics."""
    from ..stats.distribution import weighted_quantile

    col = "ecd_nm" if pixel_size_nm else "ecd_px"
    x = table.loc[table["in_statistics"].astype(bool), col].to_numpy(float) if len(table) else np.zeros(0)
    d = weighted_quantile(x, [0.1, 0.5, 0.9]) if x.size else np.full(3, np.nan)
    return {"count": int(x.size), "unit": "nm" if pixel_size_nm else "px", "d10": d[0], "d50": d[1], "d90": d[2],
            "ecd": x}


class EmparticlesWidget(QWidget):
    """Dock widget of the emparticles plugin (``Plugins > emparticles``)."""

    def __init__(self, napari_viewer):
        super().__init__()
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        from ..models.registry import DEFAULT_MODEL, available_models

        self.viewer = napari_viewer
        self.table_data = pd.DataFrame()
        self._syncing = False
        layout = QVBoxLayout(self)
        row = QHBoxLayout()
        self.model = QComboBox()
        self.model.addItems(list(available_models()))
        self.model.setCurrentText(DEFAULT_MODEL)
        self.analyze_button = QPushButton("Analyze image")
        self.analyze_button.clicked.connect(self.analyze)
        row.addWidget(self.model)
        row.addWidget(self.analyze_button)
        layout.addLayout(row)
        self.status = QLabel("Open a run folder or an image, then select its particles layer.")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels([c[0] for c in COLUMNS])
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.itemSelectionChanged.connect(self._row_selected)
        layout.addWidget(self.table)
        self.figure = Figure(figsize=(4, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        layout.addWidget(self.canvas)
        edits = QHBoxLayout()
        for text, slot, tip in (("Delete", self.delete_selected, "delete the selected particles"),
                                ("Merge", self.merge_selected, "merge the selected particles into one"),
                                ("Split", self.split_selected, ("cut the selected particle along the last line drawn "
                                                               "in the 'cut line' shapes layer")),
                                ("New", self.new_particle, "paint a missed particle with the next free id")):
            b = QPushButton(text)
            b.setToolTip(tip)
            b.clicked.connect(slot)
            edits.addWidget(b)
        layout.addLayout(edits)
        save = QHBoxLayout()
        self.save_button = QPushButton("Save corrections")
        self.save_button.setToolTip("write the corrected labels into the run folder, measure again, rebuild the "
                                    "tables and the report")
        self.save_button.clicked.connect(self.save_corrections)
        self.training_folder = QLineEdit(str(Path.home() / "emparticles-training"))
        self.training_folder.setToolTip("folder of images/ and masks/ that 'emparticles finetune' reads")
        self.train_button = QPushButton("Add to training set")
        self.train_button.clicked.connect(self.add_to_training_set)
        save.addWidget(self.save_button)
        save.addWidget(self.training_folder)
        save.addWidget(self.train_button)
        layout.addLayout(save)
        self._watched = None
        self.viewer.layers.selection.events.active.connect(lambda e: self.attach())
        self.attach()

    # ------------------------------------------------------------------ layers
    def labels_layer(self):
        """The particles layer being reviewed: the active Labels layer, else the last one."""
        from napari.layers import Labels

        active = self.viewer.layers.selection.active
        if isinstance(active, Labels) and "left out" not in active.name:
            return active
        found = [ly for ly in self.viewer.layers if isinstance(ly, Labels) and "left out" not in ly.name]
        return found[-1] if found else None

    def attach(self) -> None:
        """Follow the particles layer: its edits refresh the table, its selected label the row."""
        layer = self.labels_layer()
        if layer is self._watched:
            return
        if self._watched is not None:
            for ev in (self._watched.events.paint, self._watched.events.set_data, self._watched.events.selected_label):
                ev.disconnect(self._on_layer_event)
        self._watched = layer
        if layer is not None:
            for ev in (layer.events.paint, layer.events.set_data, layer.events.selected_label):
                ev.connect(self._on_layer_event)
        self.refresh()

    def _on_layer_event(self, event) -> None:
        if event.type == "selected_label":
            self._select_row(int(self._watched.selected_label))
        else:
            self.refresh()

    def _meta(self) -> dict:
        layer = self.labels_layer()
        return dict(layer.metadata) if layer is not None else {}

    # ------------------------------------------------------------------ table and plot
    def refresh(self) -> None:
        """Measure the particles layer again and redraw the table and the histogram."""
        layer = self.labels_layer()
        if layer is None:
            self.table_data = pd.DataFrame()
            self.table.setRowCount(0)
            return
        meta = self._meta()
        ps = meta.get("pixel_size_nm")
        self.table_data = particle_table(np.asarray(layer.data), ps, int(meta.get("infobar_rows", 0)))
        nm = ps is not None
        self._syncing = True
        self.table.setRowCount(len(self.table_data))
        for r, (_, p) in enumerate(self.table_data.iterrows()):
            for c, (_, px_col, nm_col) in enumerate(COLUMNS):
                col = nm_col if nm and nm_col else px_col
                v = p[col]
                text = str(int(v)) if col == "label" else ("yes" if v else "no") if col == "in_statistics" else f"{v:.4g}"
                item = QTableWidgetItem(text)
                item.setData(Qt.UserRole, int(p["label"]))
                self.table.setItem(r, c, item)
        self._syncing = False
        s = size_summary(self.table_data, ps)
        self.status.setText(f"{layer.name}: {len(self.table_data)} particles, {s['count']} in the statistics; "
                            f"ECD D10 {s['d10']:.4g}, D50 {s['d50']:.4g}, D90 {s['d90']:.4g} {s['unit']}")
        self.figure.clear()
        ax = self.figure.add_subplot(111)
        if s["ecd"].size:
            ax.hist(s["ecd"], bins="fd" if s["ecd"].size > 3 else 5, color="#8fb8de", edgecolor="#2b5d8a")
            for q, name in ((s["d10"], "D10"), (s["d50"], "D50"), (s["d90"], "D90")):
                ax.axvline(q, color="k", ls=":", lw=1)
                ax.text(q, ax.get_ylim()[1] * 0.95, name, rotation=90, va="top", ha="right", fontsize=7)
        ax.set_xlabel(f"ECD ({s['unit']})", fontsize=8)
        ax.set_ylabel("count", fontsize=8)
        ax.tick_params(labelsize=7)
        self.canvas.draw_idle()

    def selected_ids(self) -> list[int]:
        rows = sorted({i.row() for i in self.table.selectedItems()})
        ids = [int(self.table.item(r, 0).data(Qt.UserRole)) for r in rows]
        layer = self.labels_layer()
        if not ids and layer is not None and layer.selected_label > 0:
            ids = [int(layer.selected_label)]
        return ids

    def _row_selected(self) -> None:
        if self._syncing:
            return
        ids = self.selected_ids()
        layer = self.labels_layer()
        if ids and layer is not None:
            self._syncing = True
            layer.selected_label = ids[-1]
            layer.show_selected_label = len(ids) == 1
            self._syncing = False

    def _select_row(self, label: int) -> None:
        if self._syncing:
            return
        for r in range(self.table.rowCount()):
            if int(self.table.item(r, 0).data(Qt.UserRole)) == label:
                self._syncing = True
                self.table.selectRow(r)
                self._syncing = False
                return

    # ------------------------------------------------------------------ corrections
    def _replace(self, labels: np.ndarray) -> None:
        layer = self.labels_layer()
        layer.data = labels
        layer.show_selected_label = False
        self.refresh()

    def delete_selected(self, ids: list[int] | None = None) -> None:
        layer = self.labels_layer()
        if layer is not None:
            self._replace(delete_particles(np.asarray(layer.data), ids or self.selected_ids()))

    def merge_selected(self, ids: list[int] | None = None) -> None:
        layer = self.labels_layer()
        if layer is not None:
            self._replace(merge_particles(np.asarray(layer.data), ids or self.selected_ids()))

    def split_selected(self, particle: int | None = None, line: np.ndarray | None = None) -> None:
        """Cut a particle along ``line`` ((n, 2) data points), by default the last shape of the
        'cut line' shapes layer (made when missing: draw a line there, then press Split)."""
        layer = self.labels_layer()
        if layer is None:
            return
        if line is None:
            if "cut line" not in self.viewer.layers:
                self.viewer.add_shapes(name="cut line", shape_type="path", edge_color="yellow", edge_width=1,
                                       scale=layer.scale)
                self.viewer.layers["cut line"].mode = "add_path"
                self.status.setText("Draw the cut across the particle in the 'cut line' layer, then press Split.")
                return
            shapes = self.viewer.layers["cut line"].data
            if not shapes:
                return
            line = np.asarray(shapes[-1])[:, -2:]
        ids = [particle] if particle else self.selected_ids()
        if not ids:
            data = np.asarray(layer.data)
            r, c = np.clip(np.round(np.mean(line, axis=0)).astype(int), 0, np.array(data.shape) - 1)
            ids = [int(data[r, c])]
        self._replace(split_particle(np.asarray(layer.data), ids[0], np.asarray(line)))

    def new_particle(self) -> None:
        layer = self.labels_layer()
        if layer is not None:
            layer.selected_label = new_particle_id(np.asarray(layer.data))
            layer.mode = "paint"

    # ------------------------------------------------------------------ saving
    def save_corrections(self) -> dict | None:
        """Write the corrected labels into the layer's run folder and measure again."""
        meta, layer = self._meta(), self.labels_layer()
        if layer is None or not meta.get("run_dir"):
            self.status.setText("These particles do not come from a run folder: analyze the image first.")
            return None
        row = save_corrected_labels(Path(meta["run_dir"]), meta["image"], np.asarray(layer.data))
        self.status.setText(f"Saved: {meta['image']} now has {row['particles_measured']} particles in the statistics; "
                            f"tables and report.html rebuilt in {meta['run_dir']}")
        return row

    def add_to_training_set(self, folder: str | None = None) -> Path | None:
        """Copy the image and the (corrected) labels into FOLDER/images and FOLDER/masks, as
        ``emparticles finetune --images FOLDER/images --masks FOLDER/masks`` reads them."""
        from ..io.writers import write_label_png

        meta, layer = self._meta(), self.labels_layer()
        source = Path(meta.get("path", ""))
        if layer is None or not source.is_file():
            self.status.setText("No image file behind these particles to add.")
            return None
        out = Path(folder or self.training_folder.text()).expanduser()
        (out / "images").mkdir(parents=True, exist_ok=True)
        name = meta.get("image") or source.stem
        shutil.copy2(source, out / "images" / f"{name}{source.suffix}")
        write_label_png(np.asarray(layer.data), out / "masks" / f"{name}.png")
        self.status.setText(f"Added {name} to {out}: emparticles finetune --images {out / 'images'} "
                            f"--masks {out / 'masks'} -o MODEL")
        return out

    # ------------------------------------------------------------------ analysis
    def analyze(self) -> None:
        """Analyse the selected image layer with the chosen model in a background thread; the
        particles come back as a Labels layer, and the table follows."""
        from napari.layers import Image
        from napari.qt.threading import thread_worker
        from napari.utils import progress

        image = self.viewer.layers.selection.active
        if not isinstance(image, Image):
            images = [ly for ly in self.viewer.layers if isinstance(ly, Image)]
            image = images[-1] if images else None
        if image is None:
            self.status.setText("Open an image first.")
            return
        model_name = self.model.currentText()

        @thread_worker
        def work():
            with progress(total=0, desc=f"emparticles: {model_name}"):
                return analyse_layer(np.asarray(image.data), image.metadata, model_name)

        def done(result) -> None:
            labels, meta = result
            self.viewer.add_labels(labels, name=f"{image.name} particles", scale=image.scale[-2:], metadata=meta,
                                   opacity=0.45)
            self.analyze_button.setEnabled(True)
            self.attach()

        self.analyze_button.setEnabled(False)
        self.status.setText(f"Analysing {image.name} with {model_name}...")
        worker = work()
        worker.returned.connect(done)
        worker.errored.connect(lambda e: (self.status.setText(f"Analysis failed: {e}"),
                                          self.analyze_button.setEnabled(True)))
        worker.start()


def analyse_layer(pixels: np.ndarray, metadata: dict, model_name: str) -> tuple[np.ndarray, dict]:
    """Segment an image layer's pixels as ``analyze`` would (its info bar and pixel size from
    the layer's metadata): (full-size labels, metadata for the particles layer)."""
    from ..models.registry import load_model
    from ..pipeline import locate_infobar, segment_micrograph
    from ..types import Micrograph

    pixels = pixels if pixels.ndim == 2 else pixels[..., :3].mean(axis=-1)
    mg = Micrograph(pixels, metadata.get("pixel_size_nm"), metadata.get("pixel_size_source", ""),
                    Path(metadata["path"]) if metadata.get("path") else None)
    mg = locate_infobar(mg)
    _, full = segment_micrograph(mg, load_model(model_name, "cpu"))
    return full, {**metadata, "infobar_rows": mg.infobar_rows, "model": model_name}
