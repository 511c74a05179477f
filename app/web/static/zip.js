/* Zip files in the browser, with no library: list a zip's members (its central directory) for the
 * preview, and write a zip of chosen files (stored, not compressed: images are compressed already)
 * for the upload. The rules on which files are images mirror the service's (app/uploads.py). */
"use strict";

const CdiZip = (() => {
  const IMAGE_SUFFIXES = [".png", ".jpg", ".jpeg", ".webp", ".gif", ".tif", ".tiff", ".bmp"];
  const ARCHIVE_SUFFIXES = [".zip", ".tar", ".gz", ".tgz", ".bz2", ".tbz", ".xz", ".txz", ".7z", ".rar", ".zst",
    ".lz", ".lzma", ".jar", ".cab", ".iso", ".z"];
  const JUNK_FILES = [".DS_Store", "Thumbs.db", "desktop.ini"];

  function suffix(name) {
    const base = name.split("/").pop();
    const dot = base.lastIndexOf(".");
    return dot > 0 ? base.slice(dot).toLowerCase() : "";
  }

  /* What the service will do with a file at `path` (folders separated by "/"):
   * {kind: "image"} | {kind: "junk"} (skipped silently) | {kind: "refused", reason}. */
  function classify(path, size) {
    const parts = path.split("/").filter((p) => p && p !== ".");
    const base = parts[parts.length - 1] || "";
    if (parts[0] === "__MACOSX" || JUNK_FILES.includes(base) || base.startsWith("._")) return { kind: "junk" };
    const sfx = suffix(base);
    if (ARCHIVE_SUFFIXES.includes(sfx)) return { kind: "refused", reason: "an archive inside the set" };
    if (!IMAGE_SUFFIXES.includes(sfx)) return { kind: "refused", reason: "not an image" };
    if (size === 0) return { kind: "refused", reason: "an empty file" };
    return { kind: "image" };
  }

  /* Sort files into images, refused and skipped; names must be unique within a set. */
  function sortFiles(entries) {
    const images = [];
    const refused = [];
    let skipped = 0;
    const seen = new Map();
    for (const e of entries) {
      const c = classify(e.path, e.size);
      if (c.kind === "junk") { skipped += 1; continue; }
      if (c.kind === "refused") { refused.push({ path: e.path, reason: c.reason }); continue; }
      const base = e.path.split("/").pop();
      if (seen.has(base)) {
        refused.push({ path: e.path, reason: `another image is named ${base} (${seen.get(base)})` });
        continue;
      }
      seen.set(base, e.path);
      images.push(e);
    }
    return { images, refused, skipped };
  }

  // --- reading a zip's central directory ---------------------------------------------------

  async function listZip(file) {
    const tailSize = Math.min(file.size, 65557);
    const tail = new DataView(await file.slice(file.size - tailSize).arrayBuffer());
    let eocd = -1;
    for (let i = tailSize - 22; i >= 0; i -= 1) {
      if (tail.getUint32(i, true) === 0x06054b50) { eocd = i; break; }
    }
    if (eocd < 0) throw new Error(`${file.name} is not a zip file (or it is damaged): its directory cannot be found`);
    let count = tail.getUint16(eocd + 10, true);
    let cdSize = tail.getUint32(eocd + 12, true);
    let cdOffset = tail.getUint32(eocd + 16, true);
    if (cdOffset === 0xffffffff || count === 0xffff) {
      // Zip64: the locator sits just before the end record and points at the zip64 end record.
      const loc = eocd - 20;
      if (loc < 0 || tail.getUint32(loc, true) !== 0x07064b50) throw new Error(`${file.name}: damaged zip64 directory`);
      const recOffset = Number(tail.getBigUint64(loc + 8, true));
      const rec = new DataView(await file.slice(recOffset, recOffset + 56).arrayBuffer());
      count = Number(rec.getBigUint64(32, true));
      cdSize = Number(rec.getBigUint64(40, true));
      cdOffset = Number(rec.getBigUint64(48, true));
    }
    if (cdOffset + cdSize > file.size) throw new Error(`${file.name}: the zip file is damaged (truncated?)`);
    const cd = new DataView(await file.slice(cdOffset, cdOffset + cdSize).arrayBuffer());
    const utf8 = new TextDecoder("utf-8");
    const latin = new TextDecoder("latin1");
    const out = [];
    let p = 0;
    for (let n = 0; n < count; n += 1) {
      if (p + 46 > cd.byteLength || cd.getUint32(p, true) !== 0x02014b50) {
        throw new Error(`${file.name}: the zip file is damaged (its directory is cut short)`);
      }
      const flags = cd.getUint16(p + 8, true);
      let size = cd.getUint32(p + 24, true);
      const nameLen = cd.getUint16(p + 28, true);
      const extraLen = cd.getUint16(p + 30, true);
      const commentLen = cd.getUint16(p + 32, true);
      const bytes = new Uint8Array(cd.buffer, cd.byteOffset + p + 46, nameLen);
      const name = (flags & 0x800 ? utf8 : latin).decode(bytes).replace(/\\/g, "/");
      if (size === 0xffffffff) size = NaN; // zip64 sizes: the preview shows none rather than a wrong one
      if (!name.endsWith("/")) out.push({ path: name, size, encrypted: Boolean(flags & 1) });
      p += 46 + nameLen + extraLen + commentLen;
    }
    return out;
  }

  /* The members of a one-set zip as the service reads them: one common top folder (and a top
   * folder named after the set) is stripped. */
  function stripTop(entries, role) {
    const strip = (list) => {
      const tops = new Set(list.map((e) => e.path.split("/")[0]));
      if (list.length && tops.size === 1 && list.every((e) => e.path.includes("/"))) {
        return list.map((e) => ({ ...e, path: e.path.split("/").slice(1).join("/") }));
      }
      return list;
    };
    let out = strip(entries.filter((e) => classify(e.path, 1).kind !== "junk"));
    if (out.length && out.every((e) => e.path.split("/")[0] === role && e.path.includes("/"))) out = strip(out);
    return out;
  }

  // --- writing a zip ---------------------------------------------------------------------------

  const CRC_TABLE = (() => {
    const t = new Uint32Array(256);
    for (let n = 0; n < 256; n += 1) {
      let c = n;
      for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      t[n] = c >>> 0;
    }
    return t;
  })();

  function crc32(bytes) {
    let c = 0xffffffff;
    for (let i = 0; i < bytes.length; i += 1) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  /* A zip (a Blob) of `entries` [{path, file}], stored. `progress(done, total)` after each file.
   * The files' bytes are read once for their checksums; the Blob refers to the files themselves. */
  async function writeZip(entries, progress) {
    const enc = new TextEncoder();
    const parts = [];
    const central = [];
    let offset = 0;
    let total = 0;
    for (const e of entries) total += e.file.size;
    if (entries.length >= 0xffff || total + entries.length * 200 >= 0xffffffff) {
      throw new Error("too many or too large files for one upload from the browser: use the cdi command");
    }
    for (let i = 0; i < entries.length; i += 1) {
      const { path, file } = entries[i];
      const name = enc.encode(path);
      const crc = crc32(new Uint8Array(await file.arrayBuffer()));
      const local = new DataView(new ArrayBuffer(30));
      local.setUint32(0, 0x04034b50, true);
      local.setUint16(4, 20, true);
      local.setUint16(6, 0x800, true); // UTF-8 names
      local.setUint16(8, 0, true); // stored
      local.setUint32(14, crc, true);
      local.setUint32(18, file.size, true);
      local.setUint32(22, file.size, true);
      local.setUint16(26, name.length, true);
      parts.push(local.buffer, name, file);
      const cd = new DataView(new ArrayBuffer(46));
      cd.setUint32(0, 0x02014b50, true);
      cd.setUint16(4, 20, true);
      cd.setUint16(6, 20, true);
      cd.setUint16(8, 0x800, true);
      cd.setUint32(16, crc, true);
      cd.setUint32(20, file.size, true);
      cd.setUint32(24, file.size, true);
      cd.setUint16(28, name.length, true);
      cd.setUint32(42, offset, true);
      central.push(cd.buffer, name);
      offset += 30 + name.length + file.size;
      if (progress) progress(i + 1, entries.length);
    }
    let cdSize = 0;
    for (const c of central) cdSize += c.byteLength;
    const end = new DataView(new ArrayBuffer(22));
    end.setUint32(0, 0x06054b50, true);
    end.setUint16(8, entries.length, true);
    end.setUint16(10, entries.length, true);
    end.setUint32(12, cdSize, true);
    end.setUint32(16, offset, true);
    return new Blob([...parts, ...central, end.buffer], { type: "application/zip" });
  }

  return { classify, sortFiles, listZip, stripTop, writeZip, crc32 };
})();
