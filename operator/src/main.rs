use chatgate_operator::crd::ChatService;
use kube::CustomResourceExt;
fn main() {
    print!("{}", serde_norway::to_string(&ChatService::crd()).unwrap());
}
