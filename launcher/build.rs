include!("../kernels/torch_link.rs");

fn main() {
    link_torch();
}
