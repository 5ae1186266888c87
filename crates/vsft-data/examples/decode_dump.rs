//! Decodes an image file with vsft-data's decoder and writes raw RGB bytes to a file
//! (debugging aid: compare with PIL's `Image.open(p).convert("RGB").tobytes()`).
fn main() {
    let a: Vec<String> = std::env::args().collect();
    let bytes = std::fs::read(&a[1]).unwrap();
    match vsft_data::jpeg::decode(&bytes, vsft_data::image_proc::MAX_IMAGE_PIXELS) {
        Ok((w, h, _)) => eprintln!("own jpeg decoder: {w}x{h}"),
        Err(e) => eprintln!("own jpeg decoder: {e}"),
    }
    let img = vsft_data::image_proc::decode_image(&bytes).unwrap();
    std::fs::write(&a[2], &img.data).unwrap();
    if a.len() > 4 {
        let (w, h): (usize, usize) = (a[3].parse().unwrap(), a[4].parse().unwrap());
        let r = vsft_data::image_proc::resize_bicubic_pil(&img, w, h);
        std::fs::write(format!("{}.resized", a[2]), &r.data).unwrap();
    }
    eprintln!("{}x{}", img.width, img.height);
}

#[allow(dead_code)]
fn unused() {}
