# The VPC over three zones: public subnets for the load balancer and the NAT gateways, private
# subnets for every Kiln process, an S3 gateway endpoint (snapshot traffic never crosses the
# NAT), flow logs, and one security group per tier with only the ports Kiln uses.

locals {
  zones   = slice(var.availability_zones, 0, 3)
  public  = [for i, _ in local.zones : cidrsubnet(var.cidr, 4, i)]
  private = [for i, _ in local.zones : cidrsubnet(var.cidr, 4, i + 8)]
  nats    = 4222
  cluster = 6222
  monitor = 8222
}

resource "aws_vpc" "this" {
  cidr_block           = var.cidr
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = { Name = var.name }
}

# Nothing may use the default security group.
resource "aws_default_security_group" "closed" {
  vpc_id = aws_vpc.this.id
}

resource "aws_internet_gateway" "this" {
  vpc_id = aws_vpc.this.id
  tags   = { Name = var.name }
}

resource "aws_subnet" "public" {
  count             = 3
  vpc_id            = aws_vpc.this.id
  cidr_block        = local.public[count.index]
  availability_zone = local.zones[count.index]
  tags              = { Name = "${var.name}-public-${local.zones[count.index]}" }
}

resource "aws_subnet" "private" {
  count             = 3
  vpc_id            = aws_vpc.this.id
  cidr_block        = local.private[count.index]
  availability_zone = local.zones[count.index]
  tags              = { Name = "${var.name}-private-${local.zones[count.index]}" }
}

resource "aws_eip" "nat" {
  count  = var.single_nat_gateway ? 1 : 3
  domain = "vpc"
  tags   = { Name = "${var.name}-nat-${count.index}" }
}

resource "aws_nat_gateway" "this" {
  count         = var.single_nat_gateway ? 1 : 3
  allocation_id = aws_eip.nat[count.index].id
  subnet_id     = aws_subnet.public[count.index].id
  tags          = { Name = "${var.name}-${count.index}" }
  depends_on    = [aws_internet_gateway.this]
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.this.id
  route {
    cidr_block = "0.0.0.0/0"
    gateway_id = aws_internet_gateway.this.id
  }
  tags = { Name = "${var.name}-public" }
}

resource "aws_route_table_association" "public" {
  count          = 3
  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public.id
}

resource "aws_route_table" "private" {
  count  = 3
  vpc_id = aws_vpc.this.id
  route {
    cidr_block     = "0.0.0.0/0"
    nat_gateway_id = aws_nat_gateway.this[var.single_nat_gateway ? 0 : count.index].id
  }
  tags = { Name = "${var.name}-private-${count.index}" }
}

resource "aws_route_table_association" "private" {
  count          = 3
  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private[count.index].id
}

resource "aws_vpc_endpoint" "s3" {
  vpc_id            = aws_vpc.this.id
  service_name      = "com.amazonaws.${var.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = aws_route_table.private[*].id
  tags              = { Name = "${var.name}-s3" }
}

resource "aws_cloudwatch_log_group" "flow" {
  name              = "/kiln/${var.name}/vpc-flow"
  retention_in_days = var.flow_log_retention_days
  kms_key_id        = var.kms_key_arn
}

resource "aws_iam_role" "flow" {
  name = "${var.name}-vpc-flow"
  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "vpc-flow-logs.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy" "flow" {
  name = "write-flow-logs"
  role = aws_iam_role.flow.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect   = "Allow"
      Action   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
      Resource = "${aws_cloudwatch_log_group.flow.arn}:*"
    }]
  })
}

resource "aws_flow_log" "this" {
  vpc_id          = aws_vpc.this.id
  traffic_type    = "ALL"
  log_destination = aws_cloudwatch_log_group.flow.arn
  iam_role_arn    = aws_iam_role.flow.arn
}

# Security groups: one per tier. Rules name their peers, never the whole VPC, except the
# metrics ports, which the monitoring CIDR scrapes.

resource "aws_security_group" "tier" {
  for_each    = toset(["alb", "router", "scheduler", "billing", "gpu_node", "nats", "database", "redis"])
  name        = "${var.name}-${replace(each.key, "_", "-")}"
  description = "Kiln ${each.key}"
  vpc_id      = aws_vpc.this.id
  tags        = { Name = "${var.name}-${each.key}" }
}

resource "aws_vpc_security_group_egress_rule" "out" {
  for_each          = toset(["alb", "router", "scheduler", "billing", "gpu_node", "nats"])
  security_group_id = aws_security_group.tier[each.key].id
  description       = "HTTPS to AWS APIs and package mirrors, and the peers below"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "-1"
}

resource "aws_vpc_security_group_ingress_rule" "https" {
  for_each          = toset(var.public_cidrs)
  security_group_id = aws_security_group.tier["alb"].id
  description       = "HTTPS from the internet"
  cidr_ipv4         = each.value
  from_port         = 443
  to_port           = 443
  ip_protocol       = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "router_from_alb" {
  security_group_id            = aws_security_group.tier["router"].id
  description                  = "the load balancer to the routers"
  referenced_security_group_id = aws_security_group.tier["alb"].id
  from_port                    = var.router_port
  to_port                      = var.router_port
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "nats_clients" {
  for_each                     = toset(["router", "scheduler", "billing", "gpu_node"])
  security_group_id            = aws_security_group.tier["nats"].id
  description                  = "NATS clients: ${each.key}"
  referenced_security_group_id = aws_security_group.tier[each.key].id
  from_port                    = local.nats
  to_port                      = local.nats
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "nats_cluster" {
  security_group_id            = aws_security_group.tier["nats"].id
  description                  = "NATS cluster routes between the three servers"
  referenced_security_group_id = aws_security_group.tier["nats"].id
  from_port                    = local.cluster
  to_port                      = local.cluster
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "database" {
  for_each                     = toset(["router", "scheduler", "billing"])
  security_group_id            = aws_security_group.tier["database"].id
  description                  = "PostgreSQL from the ${each.key}"
  referenced_security_group_id = aws_security_group.tier[each.key].id
  from_port                    = 5432
  to_port                      = 5432
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "redis" {
  security_group_id            = aws_security_group.tier["redis"].id
  description                  = "Redis from the routers"
  referenced_security_group_id = aws_security_group.tier["router"].id
  from_port                    = 6379
  to_port                      = 6379
  ip_protocol                  = "tcp"
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  for_each          = { scheduler = 9464, billing = 9464, gpu_node = 9464, nats = local.monitor, router = var.router_port }
  security_group_id = aws_security_group.tier[each.key].id
  description       = "Prometheus scrapes from the monitoring network"
  cidr_ipv4         = var.monitoring_cidr
  from_port         = each.value
  to_port           = each.value
  ip_protocol       = "tcp"
}
